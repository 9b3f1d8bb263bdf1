"""The training objective (METHOD.md section 3): soft deletion/insertion AUCs.

`objective_backward` is one training step's loss and backward. With
`chunk_size` set it runs a two-stage backward: soft masks -> detached leaf ->
per-chunk target forward/backward (accumulating the masks' gradient) -> one
backward into the explainer, so peak memory is set by the chunk, not the batch.
The loss is linear in the curve values, so both paths give the same gradients.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from l2r.perturbation import (
    REFERENCES,
    blend,
    fractions,
    grid_to_pixels,
    smooth_masks,
    soft_deletion_masks,
    soft_references,
)
from l2r.ranking import gumbel_sinkhorn

TARGET_RULES = ("prediction", "ground_truth", "prediction_and_ground_truth")


@dataclass
class ObjectiveConfig:
    grid_min: int | None = None  # None: from the image size, see default_grid_range
    grid_max: int | None = None
    k_train: int = 16
    sinkhorn_iters: int = 30
    tau_start: float = 1.0
    tau_end: float = 0.3
    peak_weight: float = 0.0025
    peak_window: int = 15
    # black | mean | blur | impute | all (one at random per step) | {name: weight} (drawn per step
    # in proportion, e.g. {impute: 3, black: 3, mean: 1, blur: 1} to favour two references)
    reference: str | dict[str, float] = "all"
    targets: str = "prediction_and_ground_truth"
    smooth_sigma: float = 1.0
    noise: bool = True
    chunk_size: int | None = None  # perturbed images per target forward; None = one graph

    def __post_init__(self):
        if self.targets not in TARGET_RULES:
            raise ValueError(f"unknown target rule {self.targets!r}; choose one of {TARGET_RULES}")
        if isinstance(self.reference, dict):
            unknown = [name for name in self.reference if name not in REFERENCES]
            if unknown or not self.reference:
                raise ValueError(f"reference weights {self.reference!r}: names must be among {REFERENCES}")
            if not all(isinstance(w, (int, float)) and 0 < w < float("inf") for w in self.reference.values()):
                raise ValueError(f"reference weights {self.reference!r}: each weight must be a positive number")
        elif self.reference != "all" and self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; choose 'all', one of {REFERENCES}, "
                             "or a {name: weight} mapping of them")

    def to_dict(self) -> dict:
        return asdict(self)


def default_grid_range(height: int) -> tuple[int, int]:
    """Cells of 8..32 px at 224 px (G 7..28); small inputs keep fine grids (1..8 px cells)."""
    if height >= 224:
        return max(1, round(height / 32)), max(1, round(height / 8))
    return max(1, height // 8), min(height, 32)


def grid_range(cfg: ObjectiveConfig, height: int) -> tuple[int, int]:
    lo, hi = default_grid_range(height)
    lo = cfg.grid_min or lo
    hi = cfg.grid_max or hi
    if not 1 <= lo <= hi:
        raise ValueError(f"bad grid range {lo}..{hi}")
    return lo, hi


def sample_grid(lo: int, hi: int, generator: torch.Generator | None = None) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def tau_at(progress: float, start: float = 1.0, end: float = 0.3) -> float:
    """Linear annealing over training; progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def peak_penalty(maps: torch.Tensor, window: int = 15) -> torch.Tensor:
    """mean(relu(A - avgpool(A))^2): discourages single-pixel spikes."""
    pad = window // 2
    mode = "reflect" if pad < min(maps.shape[-2:]) else "replicate"
    local = F.avg_pool2d(F.pad(maps, (pad, pad, pad, pad), mode=mode), window, stride=1)
    return F.relu(maps - local).pow(2).mean()


def select_targets(probs: torch.Tensor, labels: torch.Tensor | None, rule: str) -> torch.Tensor:
    """Target classes (B, T) for each image.

    prediction: top-1. ground_truth: the label. prediction_and_ground_truth: the top-1 plus
    the label when the prediction is wrong, else the runner-up (also when no label, -1).
    """
    top2 = probs.topk(2, dim=1).indices
    if rule == "prediction":
        return top2[:, :1]
    has_label = labels is not None and bool((labels >= 0).all())
    if rule == "ground_truth":
        if not has_label:
            raise ValueError("target rule 'ground_truth' needs a label (>= 0) for every image")
        return labels.view(-1, 1).long()
    if rule == "prediction_and_ground_truth":
        second = top2[:, 1]
        if labels is not None:
            labels = labels.to(probs.device).long()
            wrong = (labels >= 0) & (labels != top2[:, 0])
            second = torch.where(wrong, labels, second)
        return torch.stack([top2[:, 0], second], dim=1)
    raise ValueError(f"unknown target rule {rule!r}; choose one of {TARGET_RULES}")


def soft_masks(
    scores: torch.Tensor,
    grid: int,
    size: tuple[int, int],
    tau: float,
    cfg: ObjectiveConfig,
    noise: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Deletion masks (B, 2K, H, W): K for the descending order, then K for the ascending."""
    fracs = fractions(cfg.k_train, scores.device)
    cells = []
    for direction in (scores, -scores):
        perm = gumbel_sinkhorn(direction, tau, cfg.sinkhorn_iters, noise=noise, generator=generator)
        cells.append(soft_deletion_masks(perm, fracs))
    masks = grid_to_pixels(torch.cat(cells, dim=1), grid, size)
    return smooth_masks(masks, cfg.smooth_sigma)


def perturbed_target_probs(model, images, refs, masks, targets, autocast: bool = False) -> torch.Tensor:
    """f(lerp(x, r, M_k))[c] for every mask: (B, M) from masks (B, M, H, W).

    refs: (B, 1, 3, H, W) for one reference per image, (B, M, 3, H, W) for one per mask
    (`l2r.perturbation.soft_references`).
    """
    b, m, h, w = masks.shape
    x = blend(images[:, None], refs, masks[:, :, None]).reshape(b * m, -1, h, w)
    ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        probs = model(x).float()
    return probs.gather(1, targets.repeat_interleave(m).view(-1, 1)).view(b, m)


def curve_weights(k: int, device) -> torch.Tensor:
    """Trapezoid weights over k evenly spaced fractions in [0, 1]: AUC = y @ weights."""
    w = torch.full((k,), 1.0 / (k - 1), device=device)
    w[0] = w[-1] = 0.5 / (k - 1)
    return w


def pick_reference(cfg: ObjectiveConfig, generator: torch.Generator | None = None) -> str:
    if isinstance(cfg.reference, dict):
        names = list(cfg.reference)
        weights = torch.tensor([float(cfg.reference[n]) for n in names], dtype=torch.float64)
        return names[int(torch.multinomial(weights, 1, generator=generator).item())]
    if cfg.reference != "all":
        return cfg.reference
    return REFERENCES[int(torch.randint(len(REFERENCES), (1,), generator=generator).item())]


def objective_backward(
    explainer,
    model,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: ObjectiveConfig,
    progress: float,
    generator: torch.Generator | None = None,
    autocast: bool = False,
) -> dict[str, float]:
    """One step's loss; calls backward itself (the caller steps the optimiser)."""
    with torch.no_grad():
        probs = model(images)
    targets = select_targets(probs, labels, cfg.targets)  # (B, T)
    t = targets.shape[1]
    x = images.repeat_interleave(t, dim=0)
    c = targets.reshape(-1)

    maps = explainer(x, c)  # (BT, 1, H, W)
    h, w = maps.shape[-2:]
    grid = sample_grid(*grid_range(cfg, h), generator=generator)
    scores = F.adaptive_avg_pool2d(maps, grid).flatten(1)
    tau = tau_at(progress, cfg.tau_start, cfg.tau_end)
    masks = soft_masks(scores, grid, (h, w), tau, cfg, noise=cfg.noise, generator=generator)
    refs = soft_references(x, masks, pick_reference(cfg, generator), generator)
    peak = peak_penalty(maps, cfg.peak_window)

    k = cfg.k_train
    # loss = mean AUC_desc + mean (1 - AUC_asc) + w * peak; linear in the curve values.
    dy = torch.cat([curve_weights(k, x.device), -curve_weights(k, x.device)]) / x.shape[0]
    if cfg.chunk_size is None:
        y = perturbed_target_probs(model, x, refs, masks, c, autocast)
        loss = (y * dy).sum() + 1.0 + cfg.peak_weight * peak
        loss.backward()
    else:
        y, mask_grad = _chunked_mask_grad(model, x, refs, masks, c, dy, cfg.chunk_size, autocast)
        # One backward into the explainer for both terms.
        torch.autograd.backward([masks, cfg.peak_weight * peak], [mask_grad, torch.ones_like(peak)])
        loss = (y * dy).sum() + 1.0 + cfg.peak_weight * peak.detach()
    auc_desc = (y[:, :k] @ curve_weights(k, x.device)).mean()
    auc_asc = (y[:, k:] @ curve_weights(k, x.device)).mean()
    return {
        "loss": float(loss.detach()),
        "auc_desc": float(auc_desc.detach()),
        "auc_asc": float(auc_asc.detach()),
        "peak": float(peak.detach()),
        "tau": tau,
        "grid": grid,
    }


def _chunked_mask_grad(model, x, refs, masks, targets, dy, chunk_size, autocast):
    """Stage one of the two-stage backward: curve values (B, M) and d loss / d masks."""
    b, m = masks.shape[:2]
    leaf = masks.detach().requires_grad_(True)
    flat_leaf = leaf.view(b * m, *masks.shape[2:])
    image_of = torch.arange(b, device=x.device).repeat_interleave(m)
    step_of = torch.arange(m, device=x.device).repeat(b)
    ref_of = step_of if refs.shape[1] == m else torch.zeros_like(step_of)  # one reference per mask, or per image
    y = torch.empty(b * m, device=x.device)
    for start in range(0, b * m, chunk_size):
        idx = slice(start, min(start + chunk_size, b * m))
        img = image_of[idx]
        y_chunk = perturbed_target_probs(
            model, x[img], refs[img, ref_of[idx]][:, None], flat_leaf[idx][:, None], targets[img], autocast
        ).view(-1)
        (y_chunk * dy[step_of[idx]]).sum().backward()
        y[idx] = y_chunk.detach()
    return y.view(b, m), leaf.grad
