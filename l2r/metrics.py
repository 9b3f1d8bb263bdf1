"""Exact deletion and insertion curves and their AUCs (METHOD.md section 2).

This module is the one place that decides the metric protocol. All steps of all
images go through the target model in a few large forwards (chunked to
`max_batch` images), under inference mode. Work shared between curves is done
once: the clean image (p=0 of both curves) and the reference (p=1 of both; one
forward for all images when the reference is a constant colour).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from l2r.imputation import NOISE_SIGMA, impute_chains
from l2r.perturbation import (REFERENCES, deletion_counts, delete_pixels, fractions, is_constant_reference,
                              make_reference)
from l2r.ranking import pixel_ranks

# Names as in METHOD.md and l2r.objective: the top-1 prediction or the ground-truth label.
TARGET_RULES = ("prediction", "ground_truth")
IMPUTE_CHUNK_VALUES = 1 << 23  # pixel values per imputation call (32 MB per float32 tensor)


@dataclass(frozen=True)
class Protocol:
    """What a deletion/insertion score means; recorded with every result."""

    steps: int = 21
    reference: str = "black"
    target: str = "prediction"
    # The "impute" reference's noise (sigma, and the seed of its one noise field).
    impute_noise: float = NOISE_SIGMA
    impute_seed: int = 0

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; choose one of {REFERENCES}")
        if self.target not in TARGET_RULES:
            raise ValueError(f"unknown target rule {self.target!r}; choose one of {TARGET_RULES}")
        if not self.impute_noise >= 0:
            raise ValueError(f"impute_noise must be >= 0, got {self.impute_noise}")

    def to_dict(self) -> dict:
        settings = asdict(self)
        if self.reference != "impute":  # the noise means nothing to other references
            settings.pop("impute_noise")
            settings.pop("impute_seed")
        return settings


def auc(curves: torch.Tensor, fracs: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under each curve (..., K) over the fractions."""
    return torch.trapezoid(curves, x=fracs.to(curves), dim=-1)


@torch.inference_mode()
def predict(model, images: torch.Tensor, max_batch: int = 1024) -> torch.Tensor:
    """Class probabilities (B, C), in chunks."""
    return torch.cat([model(chunk) for chunk in images.split(max_batch)])


@torch.inference_mode()
def deletion_insertion(
    model,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor | None = None,
    protocol: Protocol | None = None,
    max_batch: int = 1024,
    clean_probs: torch.Tensor | None = None,
    **protocol_fields,
) -> dict[str, torch.Tensor]:
    """Exact curves for maps (B, H, W) or (B, 1, H, W) on images (B, 3, H, W).

    `protocol` says what the score means (steps, reference, the impute reference's noise);
    scoring by hand may give its fields instead (`steps=11, reference="blur"`), not both.
    targets None means the top-1 prediction (the protocol's target rule is the caller's:
    it picks `targets`). Returns `deletion_curve` (B, K) over the fraction deleted,
    `insertion_curve` (B, K) over the fraction inserted (the curve of deleting
    least-important-first, read backwards), their AUCs (B,), `targets`, `clean_probs`
    (B, C) and `fractions` (K,).
    """
    if protocol is None:
        protocol = Protocol(**protocol_fields)
    elif protocol_fields:
        raise TypeError(f"give the protocol or its fields, not both: {sorted(protocol_fields)}")
    b, _, h, w = images.shape
    if maps.shape[0] != b or maps.shape[-2:] != (h, w) or maps.numel() != b * h * w:
        raise ValueError(f"maps {tuple(maps.shape)} do not fit images {tuple(images.shape)}")
    steps, reference = protocol.steps, protocol.reference
    device = images.device
    fracs = fractions(steps, device)
    if clean_probs is None:
        clean_probs = predict(model, images, max_batch)
    if targets is None:
        targets = clean_probs.argmax(dim=1)
    targets = targets.to(device).long()
    rows = torch.arange(b, device=device)
    y_clean = clean_probs[rows, targets]

    impute_options = {"impute_noise": protocol.impute_noise, "impute_seed": protocol.impute_seed}
    if is_constant_reference(reference):
        refs = make_reference(images[:1], reference, **impute_options).expand_as(images)
        y_ref = model(refs[:1])[0, targets]
    else:
        refs = make_reference(images, reference)
        y_ref = predict(model, refs, max_batch)[rows, targets]

    # Interior steps only: p=0 is the clean image, p=1 the reference, for both curves.
    ranks = pixel_ranks(maps.reshape(b, h, w).float()).to(torch.int32)  # 0 = most important
    counts = deletion_counts(fracs, h * w)[1:-1].to(device)  # (K-2,)
    k_inner = steps - 2
    # Job j -> (image, direction, step); direction 0 = deletion, 1 = reversed deletion.
    n_jobs = b * 2 * k_inner
    y_inner = torch.empty(n_jobs, device=device, dtype=clean_probs.dtype)
    imputing = reference == "impute"
    if imputing:
        # Each curve's steps remove nested pixel sets: the imputation solves them as chains (one
        # curve's K-2 masks after one another), so chunks hold whole curves, larger than the
        # forward's (IMPUTE_CHUNK_VALUES pixel values), then forwards go in max_batch.
        curves = max(1, max(max_batch, IMPUTE_CHUNK_VALUES // images[0].numel()) // k_inner)
        chunk = max(1, curves * k_inner)
    else:
        chunk = max_batch
    for start in range(0, n_jobs, chunk):
        job = torch.arange(start, min(start + chunk, n_jobs), device=device)
        img, rest = job // (2 * k_inner), job % (2 * k_inner)
        direction, step = rest // k_inner, rest % k_inner
        r = ranks[img]
        # Reversed deletion removes the least important first: rank >= HW - count.
        order = torch.where(direction[:, None] == 0, r, h * w - 1 - r)
        mask = (order < counts[step][:, None].to(torch.int32)).view(-1, 1, h, w)
        if imputing:
            chains = mask.view(-1, k_inner, h, w)
            perturbed = impute_chains(images[img[::k_inner]], chains, protocol.impute_noise, protocol.impute_seed).flatten(0, 1)
        else:
            perturbed = delete_pixels(images[img], mask, reference, refs[img])
        for offset in range(0, len(job), max_batch):
            part = slice(offset, offset + max_batch)
            probs = model(perturbed[part])
            picked = probs[torch.arange(len(probs), device=device), targets[img[part]]]
            y_inner[start + offset : start + offset + len(probs)] = picked

    y_inner = y_inner.view(b, 2, k_inner)
    deletion = torch.cat([y_clean[:, None], y_inner[:, 0], y_ref[:, None]], dim=1)
    reversed_deletion = torch.cat([y_clean[:, None], y_inner[:, 1], y_ref[:, None]], dim=1)
    insertion = reversed_deletion.flip(-1)
    return {
        "deletion_curve": deletion,
        "insertion_curve": insertion,
        "deletion_auc": auc(deletion, fracs),
        "insertion_auc": auc(insertion, fracs),
        "targets": targets,
        "clean_probs": clean_probs,
        "fractions": fracs,
    }


# ---------------------------------------------------------------- evidence masks (known ground truth)


def _flat_pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = maps.shape[0]
    flat_maps = maps.reshape(b, -1)
    flat_masks = masks.reshape(masks.shape[0], -1).to(device=maps.device, dtype=torch.bool)
    if flat_masks.shape != flat_maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit maps {tuple(maps.shape)}")
    return flat_maps, flat_masks


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether each map's top pixel lies inside its evidence mask: bool (B,).

    maps (B,H,W) or (B,1,H,W); masks bool of the same size. The top pixel follows the
    ranking rule of ``l2r.ranking.hard_order`` (ties: the lower flat index). An empty mask
    gives False (there is nothing to point at; callers may report it as missing).
    """
    flat_maps, flat_masks = _flat_pair(maps, masks)
    top = flat_maps.argmax(dim=1)  # the first maximal index, as hard_order's stable sort
    return flat_masks.gather(1, top[:, None])[:, 0]


def mask_auroc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """AUROC of each map's scores for telling mask pixels from the rest: float64 (B,).

    The probability that a random mask pixel scores higher than a random pixel outside
    the mask, ties counting one half (Mann-Whitney U with average ranks). 1 = every
    mask pixel ranks above every other pixel, 0.5 = chance (e.g. a constant map). NaN
    where the mask is empty or covers the whole image (undefined).
    """
    flat_maps, flat_masks = _flat_pair(maps, masks)
    scores = flat_maps.double()
    ordered = scores.sort(dim=1).values
    # 1-based average rank of each value: (#smaller + #smaller-or-equal + 1) / 2.
    below = torch.searchsorted(ordered, scores, right=False)
    upto = torch.searchsorted(ordered, scores, right=True)
    ranks = (below + upto + 1).double() / 2
    positives = flat_masks.sum(dim=1).double()
    negatives = flat_masks.shape[1] - positives
    rank_sum = (ranks * flat_masks).sum(dim=1)
    u = rank_sum - positives * (positives + 1) / 2
    result = u / (positives * negatives)
    return torch.where((positives > 0) & (negatives > 0), result, torch.full_like(result, float("nan")))
